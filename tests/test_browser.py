"""The browser tests' own plumbing: Debian's Chromium driven by Playwright reaches the real app over a real
socket and runs the emulator's Stripe.js (the card form of the hosted pages)."""

from __future__ import annotations

from typing import Any

from tests.conftest import shot


async def test_the_browser_reads_the_live_api(page: Any, live_api: str) -> None:
    response = await page.goto(f"{live_api}/healthz")
    assert response is not None and response.status == 200
    assert '"status"' in await page.inner_text("body")
    assert (await shot(page, "browser-healthz")).stat().st_size > 0


async def test_the_emulator_serves_a_stripe_js_the_browser_runs(page: Any, stripe_base: str, live_api: str) -> None:
    await page.goto(f"{live_api}/healthz")  # any http origin: Stripe.js refuses about:blank
    await page.add_script_tag(url=f"{stripe_base}/js.stripe.com/v3/")
    assert await page.evaluate("typeof Stripe") == "function"
    assert await page.evaluate("typeof Stripe('pk_test_x').elements") == "function"
