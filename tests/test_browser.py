"""The sign-up page in a real headless Chromium, driven by Playwright, against the development
app served by the real Hypercorn: sign up, be greeted, find the administrator's mail in the
development inbox and read it; sign up with an address, find its confirmation mail, follow
the link and confirm.

Chromium is Debian's (/usr/bin/chromium; .ci/run installs it); Playwright's own browser download
is never used. Without Chromium the test is skipped.
"""

from __future__ import annotations

import asyncio
import os
import re
from pathlib import Path

import pytest
from playwright.async_api import Page, async_playwright, expect

from conftest import serve_app

CHROMIUM = Path("/usr/bin/chromium")
APP_SPEC = "quartmail.app:create_app('development')"
SUBJECT = "[Flasky] New User"
CONFIRM_SUBJECT = "[Flasky] Confirm Your Address"
NAME = "Ada Lovelace"

# Playwright adds its own automation flags; these are the ones a root user on a closed network
# needs: no sandbox (root), no GPU, no calls home (refused here, slow everywhere), and no
# reliance on /dev/shm, which is small in containers (Debian's launcher script checks its
# size, but its check breaks when findmnt lists /dev/shm twice).
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# Playwright's bound on each action and expectation, in milliseconds.
TIMEOUT_MS = 10_000
STOP_TIMEOUT = 40.0

pytestmark = pytest.mark.skipif(
    not (CHROMIUM.is_file() and os.access(CHROMIUM, os.X_OK)),
    reason="Chromium not installed: apt-get install chromium",
)


async def open_inbox_when_mail_arrives(page: Page, url: str, subject: str = SUBJECT) -> None:
    """Open the development inbox, reloading until the mail with *subject* is listed: it is
    sent in the background, so it may arrive just after the greeting."""
    link = page.get_by_role("link", name=subject)
    async with asyncio.timeout(TIMEOUT_MS / 1000):
        while True:
            await page.goto(url)
            if await link.count() > 0:
                return
            await asyncio.sleep(0.2)


async def test_sign_up_and_read_the_admin_mail_in_chromium(tmp_path: Path) -> None:
    # Development: no MAIL_SERVER (serve_app drops the app's settings from the environment),
    # so the app's own development SMTP server catches the mail for /dev/inbox.
    env = {"DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'app.db'}"}
    screenshot = tmp_path / "mail.png"

    async with serve_app(APP_SPEC, env, tmp_path) as served, async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
        )
        try:
            page = await browser.new_page()
            page.set_default_timeout(TIMEOUT_MS)
            expect.set_options(timeout=TIMEOUT_MS)

            await page.goto(f"{served.url}/")
            await expect(page.get_by_role("heading", level=1)).to_have_text("Hello, Stranger!")

            await page.get_by_label("What is your name?").fill(NAME)
            await page.get_by_role("button", name="Submit").click()

            await expect(page.get_by_role("heading", level=1)).to_have_text(f"Hello, {NAME}!")
            await expect(page.get_by_text("Pleased to meet you!")).to_be_visible()

            await open_inbox_when_mail_arrives(page, f"{served.url}/dev/inbox/")
            row = page.get_by_role("row").filter(has=page.get_by_role("link", name=SUBJECT))
            await expect(row).to_have_count(1)
            await expect(row).to_contain_text("admin@example.com")

            await row.get_by_role("link", name=SUBJECT).click()
            await expect(page.get_by_role("heading", level=1)).to_have_text(SUBJECT)
            await expect(page.get_by_role("heading", name="Text")).to_be_visible()
            await expect(page.locator("pre")).to_have_text(f"User {NAME} has joined.")
            html_part = page.frame_locator("iframe[title='HTML part']")
            await expect(html_part.locator("b")).to_have_text(NAME)

            # Scrolled to, as a reader would: Chromium does not paint a sandboxed (so
            # cross-origin) frame while it is off screen, and the screenshot would show it blank.
            await page.locator("iframe").scroll_into_view_if_needed()
            await page.screenshot(path=screenshot, full_page=True)
        finally:
            await browser.close()

        served.terminate()
        assert await served.wait(STOP_TIMEOUT) == 0, served.stderr

    assert "Traceback" not in served.stderr, served.stderr
    # The development server logged the mail it caught.
    assert f"Caught mail #1 from flasky@example.com to admin@example.com: '{SUBJECT}'" in (
        served.stderr
    )
    png = screenshot.read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    assert len(png) > 1000


async def test_sign_up_with_an_address_and_confirm_it_in_chromium(tmp_path: Path) -> None:
    env = {"DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'app.db'}"}
    address = "ada@example.com"

    async with serve_app(APP_SPEC, env, tmp_path) as served, async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
        )
        try:
            page = await browser.new_page()
            page.set_default_timeout(TIMEOUT_MS)
            expect.set_options(timeout=TIMEOUT_MS)

            await page.goto(f"{served.url}/")
            await page.get_by_label("What is your name?").fill(NAME)
            await page.get_by_label("Your e-mail address (optional)").fill(address)
            await page.get_by_role("button", name="Submit").click()
            await expect(page.get_by_role("heading", level=1)).to_have_text(f"Hello, {NAME}!")
            await expect(page.get_by_role("status")).to_contain_text(
                f"We have sent a confirmation link to {address}"
            )

            await open_inbox_when_mail_arrives(page, f"{served.url}/dev/inbox/", CONFIRM_SUBJECT)
            row = page.get_by_role("row").filter(has=page.get_by_role("link", name=CONFIRM_SUBJECT))
            await expect(row).to_contain_text(address)
            await row.get_by_role("link", name=CONFIRM_SUBJECT).click()
            await expect(page.get_by_role("heading", level=1)).to_have_text(CONFIRM_SUBJECT)
            plain = await page.locator("pre").inner_text()
            [link] = re.findall(r"http://\S+/confirm/\S+", plain)
            assert link.startswith(f"{served.url}/confirm/")

            # Following the link shows a button; only pressing it confirms.
            await page.goto(link)
            await expect(page.get_by_role("heading", level=1)).to_have_text("Confirm your address")
            await expect(page.get_by_text(f"Is {address} the address of {NAME}?")).to_be_visible()
            await page.get_by_role("button", name="Confirm").click()
            await expect(page.get_by_role("heading", level=1)).to_have_text("Address confirmed")
            await expect(page.get_by_text(f"{address} is confirmed")).to_be_visible()
        finally:
            await browser.close()

        served.terminate()
        assert await served.wait(STOP_TIMEOUT) == 0, served.stderr

    assert "Traceback" not in served.stderr, served.stderr
    assert f"to {address}: '{CONFIRM_SUBJECT}'" in served.stderr
